// Publishing a Hookline event from Node.js with amqplib (npm install amqplib).
//   node examples/publish/publish.js amqp://guest:guest@127.0.0.1:5672/ webhooks
const amqp = require("amqplib");
const { randomUUID } = require("crypto");

async function main() {
  const [url, exchange] = process.argv.slice(2);
  const connection = await amqp.connect(url);
  // A confirm channel: the callback fires once the broker has taken the message.
  const channel = await connection.createConfirmChannel();
  // checkExchange, not assertExchange: the worker declares it with an alternate exchange.
  await channel.checkExchange(exchange);
  channel.on("return", (message) => {
    console.error(`unroutable: no endpoint subscribes to ${message.fields.routingKey}`);
    process.exitCode = 1;
  });
  const event = {
    id: `evt_${randomUUID().replace(/-/g, "")}`,
    type: "order.created",
    timestamp: new Date().toISOString(),
    data: { order_id: 1 },
  };
  channel.publish(exchange, event.type, Buffer.from(JSON.stringify(event)), {
    persistent: true,
    // With this header an event no endpoint subscribes to comes back ("return" above);
    // without it, it is kept in the bounded queue <exchange>.unrouted instead.
    mandatory: true,
    headers: { "hookline-mandatory": "1" },
    contentType: "application/json",
    messageId: event.id,
  });
  await channel.waitForConfirms();
  console.log(event.id);
  await connection.close();
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
