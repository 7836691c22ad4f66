-- Token accuracy next to each loss, as OpenAI reports train_mean_token_accuracy and
-- valid_mean_token_accuracy. Rows written before this migration keep NULL.
ALTER TABLE job_metrics
    ADD COLUMN train_mean_token_accuracy DOUBLE PRECISION,
    ADD COLUMN valid_mean_token_accuracy DOUBLE PRECISION;
