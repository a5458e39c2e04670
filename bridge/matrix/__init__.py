"""Matrix side: appservice routes, durable inbox, outgoing client and executor."""
