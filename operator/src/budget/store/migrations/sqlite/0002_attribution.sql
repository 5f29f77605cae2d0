-- Attribution: who spent, beyond the run and the agent. The sidecar that reports an event knows
-- its agent's team and environment and the RunBudget (workflow) it spends under.
ALTER TABLE spend_events ADD COLUMN team TEXT;
ALTER TABLE spend_events ADD COLUMN environment TEXT;
ALTER TABLE spend_events ADD COLUMN workflow TEXT;
