"""One rank's device work: the model runner, KV pools, CUDA graphs, sampling."""
