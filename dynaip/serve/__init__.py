"""`dynaip serve`: the local web app (Datasets and Generate pages)."""
