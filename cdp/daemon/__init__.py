"""The primary-site service: owns the journals, the capture jobs and the control API."""
