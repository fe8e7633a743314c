"""The Ray Serve application: deployments, FastAPI ingress and request/response schemas."""
