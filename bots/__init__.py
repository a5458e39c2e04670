"""Enclave's bots: the framework (:mod:`bots.bot`), the announcement bot
(:mod:`bots.announcements`) and the onboarding bot (:mod:`bots.onboarding`), wired into a
running Enclave by :func:`bots.wiring.build_bots`."""
