"""Applications that run the bundles: MONAI Label (training from its labels, active-learning scoring)."""
