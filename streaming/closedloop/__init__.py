"""Closed-loop test bench: a simulated participant drives a cursor through the live daemon.

participant (encoding model fitted on a real recording) → task (center-out / random targets) →
controller (aims with a visual feedback delay) → runner (real-time loop over ZeroMQ against the
real daemon) → metrics (success, time to target, dial-in, path efficiency, Fitts bitrate);
refit (ReFIT intention labels for ``POST /calibrate``); ``rpnt closedloop`` (:mod:`.cli`).
"""
