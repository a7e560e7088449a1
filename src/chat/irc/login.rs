//! Registration: CAP negotiation, SASL PLAIN and PASS, NICK/USER, and the welcome burst.

use super::*;

impl IrcConn {
    /// SASL PLAIN (the only mechanism): `AUTHENTICATE PLAIN`, then one base64 line of
    /// `authzid NUL authcid NUL password`. The password is checked at registration, against
    /// the account of the nick (which must equal authcid).
    pub(super) async fn authenticate(&mut self, line: &IrcLine) {
        let arg = line.params.first().cloned().unwrap_or_default();
        if self.attached.is_some() {
            self.numeric("907", &[], "You have already authenticated")
                .await;
            return;
        }
        if !self.caps.sasl {
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        }
        if arg.eq_ignore_ascii_case("PLAIN") {
            self.sasl_started = true;
            self.send(raw("AUTHENTICATE +".into())).await;
            return;
        }
        if !self.sasl_started {
            self.numeric("908", &["PLAIN"], "are available SASL mechanisms")
                .await;
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        }
        self.sasl_started = false;
        let decoded = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(arg.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let mut parts = decoded.as_deref().unwrap_or("").split('\0');
        let (_authz, authc, password) = (parts.next(), parts.next(), parts.next());
        let (Some(authc), Some(password)) = (authc, password) else {
            self.svc.metrics.bad_request("auth_failed");
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        };
        let hash = self
            .svc
            .store
            .state()
            .account(authc)
            .map(|a| a.hash.clone());
        let candidate = password.to_string();
        let ok = match hash {
            Some(hash) => tokio::task::spawn_blocking(move || {
                crate::chat::accounts::verify(&candidate, &hash)
            })
            .await
            .unwrap_or(false),
            None => false,
        };
        if !ok {
            self.svc.metrics.bad_request("auth_failed");
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        }
        self.password = Some(password.to_string());
        let me = self.me().to_string();
        self.numeric(
            "900",
            &[&format!("{me}!{authc}@{SERVER}"), authc],
            &format!("You are now logged in as {authc}"),
        )
        .await;
        self.numeric("903", &[], "SASL authentication successful")
            .await;
    }

    pub(super) async fn cap(&mut self, line: &IrcLine) {
        let sub = line
            .params
            .first()
            .map(|s| s.to_ascii_uppercase())
            .unwrap_or_default();
        match sub.as_str() {
            "LS" => {
                if self.attached.is_none() {
                    self.negotiating = true;
                }
                self.send(raw(format!(
                    ":{SERVER} CAP {} LS :{}",
                    self.me(),
                    CAPS.join(" ")
                )))
                .await;
            }
            "LIST" => {
                let mut on = Vec::new();
                if self.caps.server_time {
                    on.push("server-time");
                }
                if self.caps.message_tags {
                    on.push("message-tags");
                }
                if self.caps.echo {
                    on.push("echo-message");
                }
                self.send(raw(format!(
                    ":{SERVER} CAP {} LIST :{}",
                    self.me(),
                    on.join(" ")
                )))
                .await;
            }
            "REQ" => {
                if self.attached.is_none() {
                    self.negotiating = true;
                }
                let wanted = line.params.get(1).cloned().unwrap_or_default();
                let all_known = wanted
                    .split_whitespace()
                    .all(|c| CAPS.contains(&c.trim_start_matches('-')));
                if all_known {
                    for cap in wanted.split_whitespace() {
                        let (on, name) = match cap.strip_prefix('-') {
                            Some(n) => (false, n),
                            None => (true, cap),
                        };
                        match name {
                            "server-time" => self.caps.server_time = on,
                            "message-tags" => self.caps.message_tags = on,
                            "sasl" => self.caps.sasl = on,
                            _ => self.caps.echo = on,
                        }
                    }
                    self.send(raw(format!(":{SERVER} CAP {} ACK :{wanted}", self.me())))
                        .await;
                } else {
                    self.send(raw(format!(":{SERVER} CAP {} NAK :{wanted}", self.me())))
                        .await;
                }
            }
            "END" => {
                self.negotiating = false;
                self.try_register().await;
            }
            _ => self.numeric("410", &[&sub], "Invalid CAP command").await,
        }
    }

    pub(super) async fn nick(&mut self, line: &IrcLine) {
        let Some(nick) = line.params.first().filter(|n| !n.is_empty()) else {
            self.svc.metrics.bad_request("missing_field");
            self.numeric("431", &[], "No nickname given").await;
            return;
        };
        if !is_valid_user(nick) {
            self.svc.metrics.bad_request("bad_name");
            self.numeric("432", &[nick], "Erroneous nickname").await;
            return;
        }
        if let Some(a) = &self.attached {
            if fold(nick) != fold(&a.user) {
                self.notice("Changing nicks is not supported; reconnect with the new nick")
                    .await;
            }
            return;
        }
        self.nick = Some(nick.clone());
        self.try_register().await;
    }

    /// Registers once NICK and USER are in and CAP negotiation (if any) has ended.
    pub(super) async fn try_register(&mut self) {
        if self.attached.is_some() || self.negotiating || !self.user_given {
            return;
        }
        let Some(nick) = self.nick.clone() else {
            return;
        };
        let password = self.password.clone();
        let attached = match self
            .svc
            .attach(&nick, None, true, password.as_deref())
            .await
        {
            Ok(a) => a,
            Err(ChatError::NameTaken(_)) => {
                self.nick = None;
                self.send(raw(format!(
                    ":{SERVER} 433 * {nick} :Nickname is already in use"
                )))
                .await;
                return;
            }
            Err(ChatError::BadName(_)) => {
                self.nick = None;
                self.numeric("432", &[&nick], "Erroneous nickname").await;
                return;
            }
            Err(e @ (ChatError::AuthRequired | ChatError::AuthFailed)) => {
                self.numeric("464", &[], &format!("Password incorrect: {e}"))
                    .await;
                self.fatal(&e.to_string()).await;
                self.closed.cancel();
                return;
            }
            Err(e) => {
                self.fatal(&format!("cannot register now: {e}")).await;
                self.closed.cancel();
                return;
            }
        };
        self.svc.register(&attached);
        self.nick = Some(attached.user.clone());
        let me = attached.user.clone();
        self.numeric(
            "001",
            &[],
            &format!("Welcome to the raftchat Network, {}", source(&me)),
        )
        .await;
        self.numeric(
            "002",
            &[],
            &format!("Your host is {SERVER}, running version {VERSION}"),
        )
        .await;
        self.numeric("003", &[], "This server was created with Raft")
            .await;
        self.send(raw(format!(":{SERVER} 004 {me} {SERVER} {VERSION} i nt")))
            .await;
        self.numeric(
            "005",
            &[
                "NETWORK=raftchat",
                "CASEMAPPING=ascii",
                "CHANTYPES=#",
                "NICKLEN=30",
                "CHANNELLEN=50",
                "PREFIX=()",
                "CHANMODES=,,,nt",
            ],
            "are supported by this server",
        )
        .await;
        self.motd().await;
        let sub = self.svc.store.subscribe(Subscriber {
            session: &attached.session,
            session_id: attached.id,
            user: &me,
        });
        let rooms = sub.rooms;
        if attached.resumed {
            let _span = reconnect_span(&self.svc, DIALECT, &self.peer, attached.id, 0);
        }
        let filter = DeliveryFilter::new(
            attached.session.clone(),
            attached.id,
            attached.attachment,
            &me,
            rooms,
            sub.applied,
        );
        let follow = Follow {
            session: attached.session.clone(),
            user: me.clone(),
            filter,
            events: sub.events,
        };
        let render = IrcRender {
            caps: self.caps,
            me,
        };
        tokio::spawn(deliver(
            self.svc.clone(),
            follow,
            render,
            self.out.clone(),
            self.closed.clone(),
            self.reason.clone(),
        ));
        let (svc, session, out, nick) = (
            self.svc.clone(),
            attached.session.clone(),
            self.out.clone(),
            self.nick.clone().unwrap_or_default(),
        );
        self.sends = Some(Sends::new(move || {
            let (tx, rx) = mpsc::channel(SEND_QUEUE);
            let task = tokio::spawn(send_loop(svc, session, rx, out, nick));
            SendPipeline { queue: tx, task }
        }));
        self.attached = Some(attached);
    }

    pub(super) async fn motd(&self) {
        match &self.svc.config.motd {
            Some(motd) => {
                self.numeric("375", &[], &format!("- {SERVER} Message of the day -"))
                    .await;
                for line in motd.lines() {
                    self.numeric("372", &[], &format!("- {line}")).await;
                }
                self.numeric("376", &[], "End of /MOTD command.").await;
            }
            None => self.numeric("422", &[], "MOTD File is missing").await,
        }
    }
}
