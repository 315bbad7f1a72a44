"""The diffusion formulation of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", EDM) in the vocabulary of Stability's generative-models (sgm) configs.

Data are noised as x = x0 + sigma * n (n ~ N(0, I)); a denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
wraps the network F. The DDPM process of `gaussian_diffusion` is the case sigma = sqrt((1 - alpha_bar) / alpha_bar),
x = x_t / sqrt(alpha_bar). Modules: `discretization` (sigma tables), `scalings` (c_skip, c_out, c_in, c_noise),
`denoiser`, `sigma_sampling` and `loss_weighting` (training noise levels and weights), `loss`, `k_samplers`
(solver functions), `guiders` and `samplers` (sgm's sampler classes over the solvers).
"""
