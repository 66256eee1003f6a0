"""Models: the Potential wrapper (energy to forces and stress), model files, fine-tuning starts, uncertainty heads and calibration, the ASE calculator.

Internal layout; the public API is :mod:`atomforge` itself."""
