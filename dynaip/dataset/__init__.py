"""The dataset as a consumer sees it (docs/ARCHITECTURE.md, "Dataset directory"): ``format`` (names
and checks, standard library only), ``manifest`` (reading manifest.json), ``store`` (where a dataset
lives, atomic writes) and ``inspect`` (show / verify / grid, sort keys). Below both curation
(``pipeline``), which writes through it, and training, precompute, serve and eval, which read
through it; it imports neither."""
