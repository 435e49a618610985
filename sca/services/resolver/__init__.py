"""Sample service resolver: C source, bin/resolver, service.toml and traffic generators."""
