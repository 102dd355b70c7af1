raise RuntimeError("the reward server is not configured")
