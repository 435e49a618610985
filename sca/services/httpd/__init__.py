"""Sample service httpd: C source, bin/httpd, service.toml and traffic generators."""
