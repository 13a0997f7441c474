/*
 * mqtt_chat: ask an edge_sdk device for a chat completion over MQTT 5 and print the streamed
 * answer. A small firmware-style example with libmosquitto only (Debian: libmosquitto-dev).
 *
 *   cc -O2 -Wall -o mqtt_chat mqtt_chat.c -lmosquitto
 *   ./mqtt_chat -h localhost -p 1883 -d jetson "Where is the red box?"
 *   ./mqtt_chat -d jetson -a command.wav               transcribe (a device with audio)
 *   ./mqtt_chat -d jetson -a question.wav "Answer it."  chat about the audio
 *
 * Audio (-a, a WAV/FLAC/OGG file) is the MQTT 5 binary payload, with its Content Type, and the
 * JSON request travels in the user property "request" (op "transcribe", or "chat" with an
 * {"type": "audio", "payload": true} part).
 *
 * Protocol (edge_sdk/protocol/PROTOCOL.md): publish a JSON request on
 *   <prefix>/v1/<device>/req/<name>/chat
 * with the MQTT 5 Response Topic <prefix>/v1/clients/<name>/res/<device> and Correlation Data;
 * <name> is the username (or the client id without one). Events arrive on the response topic:
 * "accepted", then "delta"s with text, then one "result" (whole text, usage) or "error".
 *
 * Exit status: 0 answer printed, 1 error reply, 2 usage, 3 connection problem / timeout.
 */
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TOPIC_MAX 512

struct state {
    char req_topic[TOPIC_MAX];
    char reply_topic[TOPIC_MAX];
    char status_topic[TOPIC_MAX];
    char request_id[64];
    char *payload;      /* the JSON request */
    char *audio;        /* with -a: the file, sent as the binary payload */
    long audio_len;
    const char *audio_mime;
    int subscribed;
    int printed;   /* a delta was printed */
    int done;      /* 1 result, 2 error, 3 offline */
};

/* ---- a minimal JSON reader: top-level string values of a flat object ---------------------- */

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

static const char *skip_string(const char *p) { /* p at the opening quote */
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1]) p++;
    return *p ? p + 1 : p;
}

static const char *skip_value(const char *p) {
    int depth = 0;
    p = skip_ws(p);
    do {
        if (*p == '"') { p = skip_string(p); continue; }
        if (*p == '{' || *p == '[') depth++;
        else if (*p == '}' || *p == ']') depth--;
        else if (depth == 0 && (*p == ',')) break;
        if (*p) p++;
    } while (*p && depth > 0);
    if (depth == 0) /* a literal or number: run to the next ',' or '}' */
        while (*p && *p != ',' && *p != '}') p++;
    return p;
}

/* The value of top-level key `key`, or NULL. */
static const char *json_find(const char *json, const char *key) {
    const char *p = skip_ws(json);
    size_t klen = strlen(key);
    if (*p != '{') return NULL;
    p++;
    for (;;) {
        p = skip_ws(p);
        if (*p != '"') return NULL;
        const char *k = p + 1, *kend = skip_string(p) - 1;
        p = skip_ws(kend + 1);
        if (*p != ':') return NULL;
        p = skip_ws(p + 1);
        if ((size_t)(kend - k) == klen && strncmp(k, key, klen) == 0) return p;
        p = skip_ws(skip_value(p));
        if (*p != ',') return NULL;
        p++;
    }
}

static void put_utf8(unsigned cp, char **o, char *end) {
    char buf[4];
    int n;
    if (cp < 0x80) { buf[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { buf[0] = (char)(0xC0 | cp >> 6); buf[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        buf[0] = (char)(0xE0 | cp >> 12); buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        buf[0] = (char)(0xF0 | cp >> 18); buf[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        buf[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); buf[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    if (*o + n < end) { memcpy(*o, buf, (size_t)n); *o += n; }
}

/* Decode the JSON string at p (the opening quote) into out; returns 0 on success. */
static int json_string(const char *p, char *out, size_t cap) {
    char *o = out, *end = out + cap - 1;
    if (!p || *p != '"') return -1;
    for (p++; *p && *p != '"'; p++) {
        if (*p != '\\') { if (o < end) *o++ = *p; continue; }
        p++;
        switch (*p) {
        case 'n': if (o < end) *o++ = '\n'; break;
        case 't': if (o < end) *o++ = '\t'; break;
        case 'r': if (o < end) *o++ = '\r'; break;
        case 'b': if (o < end) *o++ = '\b'; break;
        case 'f': if (o < end) *o++ = '\f'; break;
        case 'u': {
            unsigned cp = 0;
            if (sscanf(p + 1, "%4x", &cp) != 1) return -1;
            p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && p[1] == '\\' && p[2] == 'u') {
                unsigned lo = 0;
                if (sscanf(p + 3, "%4x", &lo) == 1 && lo >= 0xDC00 && lo < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
            }
            put_utf8(cp, &o, end);
            break;
        }
        default: if (o < end) *o++ = *p; /* \" \\ \/ */
        }
    }
    *o = '\0';
    return *p == '"' ? 0 : -1;
}

static char *json_escape(const char *s) {
    size_t n = strlen(s);
    char *out = malloc(n * 6 + 3), *o = out;
    if (!out) return NULL;
    *o++ = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { *o++ = '\\'; *o++ = (char)c; }
        else if (c == '\n') { *o++ = '\\'; *o++ = 'n'; }
        else if (c < 0x20) o += sprintf(o, "\\u%04x", c);
        else *o++ = (char)c;
    }
    *o++ = '"';
    *o = '\0';
    return out;
}

/* ---- MQTT callbacks ------------------------------------------------------------------------- */

static void on_connect(struct mosquitto *m, void *obj, int rc, int flags, const mosquitto_property *props) {
    struct state *st = obj;
    (void)flags; (void)props;
    if (rc != 0) {
        fprintf(stderr, "mqtt_chat: broker refused the connection: %s\n", mosquitto_reason_string(rc));
        st->done = 3;
        return;
    }
    char *subs[2] = {st->reply_topic, st->status_topic};
    mosquitto_subscribe_multiple(m, NULL, 2, subs, 1, 0, NULL);
}

static void on_subscribe(struct mosquitto *m, void *obj, int mid, int qos_count, const int *granted,
                         const mosquitto_property *props) {
    struct state *st = obj;
    (void)mid; (void)props;
    for (int i = 0; i < qos_count; i++) {
        if (granted[i] >= 0x80) {
            fprintf(stderr, "mqtt_chat: subscription refused (check the ACL / username)\n");
            st->done = 3;
            return;
        }
    }
    if (st->subscribed++) return;
    /* The request: Response Topic + Correlation Data for MQTT 5; the id also in the payload. */
    mosquitto_property *p = NULL;
    mosquitto_property_add_string(&p, MQTT_PROP_RESPONSE_TOPIC, st->reply_topic);
    mosquitto_property_add_binary(&p, MQTT_PROP_CORRELATION_DATA, st->request_id, (uint16_t)strlen(st->request_id));
    int rc;
    if (st->audio) {
        mosquitto_property_add_string(&p, MQTT_PROP_CONTENT_TYPE, st->audio_mime);
        mosquitto_property_add_string_pair(&p, MQTT_PROP_USER_PROPERTY, "request", st->payload);
        rc = mosquitto_publish_v5(m, NULL, st->req_topic, (int)st->audio_len, st->audio, 1, false, p);
    } else {
        mosquitto_property_add_byte(&p, MQTT_PROP_PAYLOAD_FORMAT_INDICATOR, 1);
        rc = mosquitto_publish_v5(m, NULL, st->req_topic, (int)strlen(st->payload), st->payload, 1, false, p);
    }
    mosquitto_property_free_all(&p);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "mqtt_chat: publish failed: %s\n", mosquitto_strerror(rc));
        st->done = 3;
    }
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props) {
    struct state *st = obj;
    (void)m; (void)props;
    char *json = malloc((size_t)msg->payloadlen + 1);
    if (!json) return;
    memcpy(json, msg->payload, (size_t)msg->payloadlen);
    json[msg->payloadlen] = '\0';

    if (strcmp(msg->topic, st->status_topic) == 0) {
        if (strcmp(json, "offline") == 0) {
            fprintf(stderr, "mqtt_chat: device is offline\n");
            st->done = 3;
        }
        free(json);
        return;
    }
    char type[32], rid[128];
    if (json_string(json_find(json, "type"), type, sizeof type) != 0 ||
        json_string(json_find(json, "request_id"), rid, sizeof rid) != 0 || strcmp(rid, st->request_id) != 0) {
        free(json); /* not an event of our request */
        return;
    }
    size_t cap = (size_t)msg->payloadlen + 1;
    char *text = malloc(cap);
    if (!text) { free(json); return; }
    if (strcmp(type, "delta") == 0) {
        if (json_string(json_find(json, "text"), text, cap) == 0) {
            fputs(text, stdout);
            fflush(stdout);
            st->printed = 1;
        }
    } else if (strcmp(type, "result") == 0) {
        char reason[32] = "?";
        json_string(json_find(json, "finish_reason"), reason, sizeof reason);
        if (!st->printed && json_string(json_find(json, "text"), text, cap) == 0) fputs(text, stdout);
        fputc('\n', stdout);
        fflush(stdout);
        const char *usage = json_find(json, "usage");
        fprintf(stderr, "[finish_reason=%s usage=%.*s]\n", reason, usage ? (int)(skip_value(usage) - usage) : 0,
                usage ? usage : "");
        st->done = 1;
    } else if (strcmp(type, "error") == 0) {
        json_string(json_find(json, "message"), text, cap);
        const char *status = json_find(json, "status");
        fprintf(stderr, "mqtt_chat: error %d: %s\n", status ? atoi(status) : 0, text);
        st->done = 2;
    }
    free(text);
    free(json);
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [-h host] [-p port] [-d device_id] [-t prefix] [-u user] [-P password]\n"
            "          [-i client_id] [-n max_tokens] [-s seed] [-T timeout_s] [-a audio_file] [PROMPT]\n", argv0);
}

/* The whole file, and its MIME type from its first bytes; NULL (with a message) if unusable. */
static char *read_audio(const char *path, long *len, const char **mime) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); return NULL; }
    fseek(f, 0, SEEK_END);
    *len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = *len > 0 ? malloc((size_t)*len) : NULL;
    if (!data || fread(data, 1, (size_t)*len, f) != (size_t)*len) {
        fprintf(stderr, "%s: cannot read\n", path);
        fclose(f);
        free(data);
        return NULL;
    }
    fclose(f);
    if (*len >= 12 && memcmp(data, "RIFF", 4) == 0 && memcmp(data + 8, "WAVE", 4) == 0) *mime = "audio/wav";
    else if (*len >= 4 && memcmp(data, "fLaC", 4) == 0) *mime = "audio/flac";
    else if (*len >= 4 && memcmp(data, "OggS", 4) == 0) *mime = "audio/ogg";
    else {
        fprintf(stderr, "%s: not a WAV, FLAC or OGG file\n", path);
        free(data);
        return NULL;
    }
    return data;
}

int main(int argc, char **argv) {
    const char *host = "localhost", *device = "jetson", *prefix = "edge", *user = NULL, *pass = NULL;
    const char *client_id = NULL, *audio_path = NULL;
    int port = 1883, max_tokens = 128, timeout_s = 60, opt;
    long long seed = -1;
    while ((opt = getopt(argc, argv, "h:p:d:t:u:P:i:n:s:T:a:")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'd': device = optarg; break;
        case 't': prefix = optarg; break;
        case 'u': user = optarg; break;
        case 'P': pass = optarg; break;
        case 'i': client_id = optarg; break;
        case 'n': max_tokens = atoi(optarg); break;
        case 's': seed = atoll(optarg); break;
        case 'T': timeout_s = atoi(optarg); break;
        case 'a': audio_path = optarg; break;
        default: usage(argv[0]); return 2;
        }
    }
    if (audio_path ? optind < argc - 1 : optind != argc - 1) { usage(argv[0]); return 2; }

    struct state st;
    memset(&st, 0, sizeof st);
    if (audio_path && !(st.audio = read_audio(audio_path, &st.audio_len, &st.audio_mime))) return 2;
    const char *op = audio_path && optind == argc ? "transcribe" : "chat";
    char cid[64];
    if (!client_id) {
        snprintf(cid, sizeof cid, "mqtt-chat-%ld", (long)getpid());
        client_id = cid;
    }
    const char *name = user ? user : client_id; /* the ACL identifies clients by username */
    snprintf(st.request_id, sizeof st.request_id, "c-%ld-%ld", (long)getpid(), (long)time(NULL));
    snprintf(st.req_topic, TOPIC_MAX, "%s/v1/%s/req/%s/%s", prefix, device, name, op);
    snprintf(st.reply_topic, TOPIC_MAX, "%s/v1/clients/%s/res/%s", prefix, name, device);
    snprintf(st.status_topic, TOPIC_MAX, "%s/v1/%s/status", prefix, device);

    char *prompt = json_escape(optind < argc ? argv[optind] : "");
    char seed_field[48] = "";
    if (seed >= 0) snprintf(seed_field, sizeof seed_field, ",\"seed\":%lld", seed);
    size_t plen = (prompt ? strlen(prompt) : 0) + 512;
    st.payload = malloc(plen);
    if (!prompt || !st.payload) return 3;
    if (strcmp(op, "transcribe") == 0)
        snprintf(st.payload, plen,
                 "{\"v\":1,\"request_id\":\"%s\",\"audio\":{\"payload\":true,\"mime\":\"%s\"},"
                 "\"max_tokens\":%d,\"stream\":true}", st.request_id, st.audio_mime, max_tokens);
    else if (st.audio)
        snprintf(st.payload, plen,
                 "{\"v\":1,\"request_id\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":["
                 "{\"type\":\"audio\",\"payload\":true,\"mime\":\"%s\"},{\"type\":\"text\",\"text\":%s}]}],"
                 "\"max_tokens\":%d%s,\"stream\":true}", st.request_id, st.audio_mime, prompt, max_tokens, seed_field);
    else
        snprintf(st.payload, plen,
                 "{\"v\":1,\"request_id\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":%s}],"
                 "\"max_tokens\":%d%s,\"stream\":true}", st.request_id, prompt, max_tokens, seed_field);
    free(prompt);

    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(client_id, true, &st);
    if (!m) { fprintf(stderr, "mqtt_chat: out of memory\n"); return 3; }
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1); /* ~0.6 ms instead of ~40-90 ms per message */
    if (user) mosquitto_username_pw_set(m, user, pass);
    mosquitto_connect_v5_callback_set(m, on_connect);
    mosquitto_subscribe_v5_callback_set(m, on_subscribe);
    mosquitto_message_v5_callback_set(m, on_message);

    int rc = mosquitto_connect_bind_v5(m, host, port, 30, NULL, NULL);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "mqtt_chat: cannot connect to %s:%d: %s\n", host, port, mosquitto_strerror(rc));
        return 3;
    }
    time_t start = time(NULL);
    while (!st.done) {
        rc = mosquitto_loop(m, 100, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "mqtt_chat: connection lost: %s\n", mosquitto_strerror(rc));
            st.done = 3;
        }
        if (time(NULL) - start > timeout_s) {
            fprintf(stderr, "mqtt_chat: no answer within %d s\n", timeout_s);
            st.done = 3;
        }
    }
    mosquitto_disconnect_v5(m, 0, NULL);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    free(st.payload);
    free(st.audio);
    return st.done == 1 ? 0 : st.done == 2 ? 1 : 3;
}
