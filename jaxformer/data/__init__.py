"""Data: where data sets live, reading users' text files, the BPE trainer, and llm.c-format token
shards for pretraining (writing them from corpora, and reading them at constant memory)."""
