"""Scoring samples: FID/IS/KID over a feature extractor, fidelity to the FP model (PSNR, per-step and held-out
noise-prediction error), statistics over seeds, and the report table and plots."""
