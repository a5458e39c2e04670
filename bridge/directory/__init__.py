"""Directory sync: sources (file, LDAP/AD, SCIM) -> snapshots -> pure diff -> actions."""
