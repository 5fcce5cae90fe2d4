"""The online service: the bundles of models/ behind BentoML (`bentoml serve`). Never imports torch."""
