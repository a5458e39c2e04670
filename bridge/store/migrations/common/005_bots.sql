-- v5 made the announcement bot's tables here. The bots are an extension now and own them:
-- bots/migrations (component "bots" in enclave_schema_components) creates them, and adopts
-- those a database made by an earlier release already has. Kept so the numbering holds.
SELECT 1;
