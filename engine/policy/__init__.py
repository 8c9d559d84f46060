"""The policy engine: evaluators (OPA in-process, an OPA server over REST), the OPA
process the service supervises, and the loader that keeps the running revision."""
