"""The operators' web console at ``/console`` (issue 19): sign-in through the homeserver,
access by directory group, and pages over the same service functions the CLI calls."""
