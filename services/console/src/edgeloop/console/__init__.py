"""The ops console: server-rendered pages over the platform's HTTP APIs."""
