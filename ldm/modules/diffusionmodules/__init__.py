"""Network building blocks: the autoencoder's Encoder/Decoder, the UNet and its embeddings."""
