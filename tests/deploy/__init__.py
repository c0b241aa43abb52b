"""Offline checks of the deployment files (Docker, compose, Prometheus, Grafana, k8s)."""
