"""The embedded default: scikit-learn's 8x8 digits upsampled to 32x32, a small latent teacher
(AutoencoderKL + DiTTransformer2DModel) trained by the project, and a digits judge."""
