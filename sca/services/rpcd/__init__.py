"""Sample service rpcd: C source, bin/rpcd, service.toml and traffic generators."""
