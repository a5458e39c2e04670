"""The announcement bot: targeted, scheduled and ad-hoc announcements with acknowledgements,
reminders, escalation, reports and webhooks (see :mod:`bots.announcements.bot`)."""
