"""The gate: Enclave's answer before an invite, join, room creation, protected state change or
user-directory result happens.

* :mod:`.module` — the Synapse module (runs inside Synapse; standard library, ``synapse``
  and ``twisted`` only, so it can be copied as one file). Import it by its full path.
* :mod:`.protocol` — the request/answer shapes, pure.
* :mod:`.service` — the ``POST /_enclave/gate/v1/check`` route on Enclave's side.

Deliberately imports nothing: Synapse imports ``bridge.gate.module`` through this package,
and must not pull in Enclave's own dependencies on the way.
"""
