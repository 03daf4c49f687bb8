"""The ViFT method: capture, steer, per-family adapters, the calibration search, the serving modes."""
