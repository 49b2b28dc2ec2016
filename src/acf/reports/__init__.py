"""A run's report (markdown + plots) and the frames and plots the notebook uses, from frontier.json."""
