"""The Ray/torch backend: model loading with the zone plan, TRL SFT then DPO per topic, the Ray Train driver."""
