"""Ablations of the GSA module (Shen et al. 2020, Sec. 4.4) on the ImageNet recipe."""
