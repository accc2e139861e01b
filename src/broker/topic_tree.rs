//! Subscription tree: topic filters -> subscribed sessions, with `+`/`#` wildcards,
//! `$`-topic rules and `$share/{group}/{filter}` groups (round robin within a group).
