"""TorchServe adapter: the custom handler (``branched_handler``) and ``branched archive`` (``archive``)."""
