"""One collector per signal. Each reads its kernel maps at scrape time through a source object
passed in (so unit tests hand it fixtures), folds the deltas into SeriesStores and builds fresh
metric families from them."""
