import os

import torch

os.environ.setdefault("PIPESERVE_P2P_TIMEOUT", "30")
if not torch.cuda.is_available():
    # before any Triton kernel is defined: without a GPU, the tests that run the kernels (the
    # triton backend, the fused layer kernels) run them under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
