-- Rewards of DPO steps: the means over a step's pairs of the chosen and rejected rewards, the
-- share of pairs ranked correctly and the mean margin. Other methods leave them NULL.
ALTER TABLE job_metrics ADD COLUMN reward_chosen REAL;
ALTER TABLE job_metrics ADD COLUMN reward_rejected REAL;
ALTER TABLE job_metrics ADD COLUMN reward_accuracy REAL;
ALTER TABLE job_metrics ADD COLUMN reward_margin REAL;
