"""Evaluation: TorchMetrics 3H and interaction metrics, the evaluate runner and its reports."""
