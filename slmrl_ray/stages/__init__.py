"""The pipeline's stages, one module each, each with one entry `run_<stage>(config, paths, report)`.

Stages run without Ray; they read their inputs from the previous stages' artifact
folders (`slmrl_ray.artifacts`) and write their own.
"""
