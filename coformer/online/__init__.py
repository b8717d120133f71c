"""Online runtime: a worker's state and admission of sub-models, and the coordinator that fans a request out."""
