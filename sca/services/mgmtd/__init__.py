"""Sample service mgmtd: C source, bin/mgmtd, service.toml and traffic generators."""
