"""Calibration data (Q-Diffusion's file format, selection, generation) and the step-to-segment split."""
from .calibration import (CalibrationFile, load_calibration, read_calibration_meta, record_trajectories,
                          save_calibration, select_steps, trajectory_generator)
from .segments import equal_share_boundaries, segment_of_step, timestep_segments

__all__ = ["CalibrationFile", "load_calibration", "read_calibration_meta", "record_trajectories", "save_calibration",
           "select_steps", "trajectory_generator", "segment_of_step", "timestep_segments", "equal_share_boundaries"]
