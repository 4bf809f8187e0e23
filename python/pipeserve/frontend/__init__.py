"""Front-end processes' side: the offline `Engine`, the request client it shares with the server, tokenizing and detokenizing, and rank supervision. No torch."""
