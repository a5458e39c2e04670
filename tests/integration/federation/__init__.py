"""End-to-end tests with two federating homeservers: corporate (Enclave) and personal."""
