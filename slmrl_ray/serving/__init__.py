"""Ray Serve: one application serving the SFT and PPO policies and the reward models (OpenAI-compatible)."""
