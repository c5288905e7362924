"""OpenVINO: the vision encoder as an OpenVINO IR, compiled for the CPU plugin (an optional extra)."""
