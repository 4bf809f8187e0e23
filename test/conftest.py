import os

os.environ.setdefault("PIPESERVE_P2P_TIMEOUT", "30")
