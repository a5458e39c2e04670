-- PLACEHOLDER (branch s3stage only): migration 009 belongs to another branch; delete this
-- file when merging (s3stage uses 011 only).
SELECT 1;
