"""`redi bench` targets: each module has `run(quick: bool) -> dict` returning measured figures."""
